"""faceveil: offline adversarial identity masks (TIP-IM, OPOM, APF, AdvCloak) over a verified recogniser zoo."""

from faceveil.runtime.openmp import choose_wait_policy

# Before torch is imported: its OpenMP runtime reads the wait policy once, when it loads (see faceveil.runtime.openmp).
choose_wait_policy()

__version__ = "0.1.0"
