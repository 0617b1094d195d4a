"""faceveil: offline adversarial identity masks (TIP-IM, OPOM, APF, AdvCloak) over a verified recogniser zoo."""

from faceveil.malloc import keep_freed_memory
from faceveil.openmp import choose_wait_policy

# Before torch is imported: its OpenMP runtime reads the wait policy once, when it loads (see faceveil.openmp).
choose_wait_policy()
# Before the first large tensor: freed memory stays with the process (see faceveil.malloc).
keep_freed_memory()

__version__ = "0.1.0"
