"""Protection methods, each a small file composed from the attack core (faceveil.attacks)."""
