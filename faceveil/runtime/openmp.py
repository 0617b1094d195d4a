"""How OpenMP's idle threads wait: spin briefly (libgomp's default) on a free machine, sleep at once on a busy one.

Decided once per process, before torch (and numba's OpenMP pool) start their runtimes, which read the setting only
when they load. Two libgomp runtimes run in a faceveil process: torch's bundled one and the system's, which numba's
pool links by its full file name. Measured on this project's 2-core machine (forward+backward of mobileface +
mfn512 on random crops, as `bench protect` times its floor; fastest of 3, ms, several processes each):

| machine | waiting | 1 face | 16 faces |
|---|---|---|---|
| idle | sleep at once (OMP_WAIT_POLICY=PASSIVE) | 50-59 | 187-280 |
| idle | spin, then sleep (libgomp's default; also GOMP_SPINCOUNT 3000 or 30000) | 22-30 | 160-211 |
| one other busy process | sleep at once | 33-35 | 286-321 |
| one other busy process | spin, then sleep | 37-104 | 162-623 |

Every operator of a batch-1 network is a short parallel region; a thread that sleeps between them must be woken by a
system call each time (futex calls halve with spinning), which doubles one face's time. But a spinning thread holds
a core that another process needs, and then the working thread waits for its time slice. So: spin unless the cores
were busy when the process started. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping

CHOSEN_BY_US = "FACEVEIL_CHOSE_OMP_WAIT_POLICY"  # marks a policy this module set (children decide again)
SAMPLE_SECONDS = 0.1
BUSY_SHARE = 0.25  # other work on more than a quarter of the cores: sleep at once


def busy_share(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Share of all CPU time that other processes used over `seconds` (this one sleeps); None without /proc."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    if second is None:
        return None
    total = sum(second) - sum(first)
    idle = (second[3] + second[4]) - (first[3] + first[4])  # idle + iowait
    return None if total <= 0 else 1.0 - idle / total


def _cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return [int(v) for v in fields[1:9]] if fields and fields[0] == "cpu" and len(fields) >= 9 else None


def choose_wait_policy(env: MutableMapping[str, str] = os.environ,
                       measure: Callable[[], float | None] = busy_share) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in `env` when the machine is busy; the policy now in force (None = libgomp's
    default, spin then sleep)."""
    if env.pop(CHOSEN_BY_US, None) is not None:
        env.pop("OMP_WAIT_POLICY", None)  # inherited from a parent faceveil, not asked for by the user
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return env.get("OMP_WAIT_POLICY")
    share = measure()
    if share is not None and share > BUSY_SHARE:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env[CHOSEN_BY_US] = "1"
        return "PASSIVE"
    return None
