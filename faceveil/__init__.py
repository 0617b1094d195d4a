"""faceveil: offline adversarial identity masks (TIP-IM, OPOM, APF, AdvCloak) over a verified recogniser zoo."""

import os

# Must be set before torch is imported: with the default (active) wait policy the two OpenMP threads of this
# small CPU spin against each other and against other processes; measured 120 -> 47 ms/face (faceres F+B, b=8).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
