"""AdvCloak (Liu et al. 2023): a generator trained in two stages that makes a person's privacy mask in one forward
pass. networks (G, D), losses (Eq. 10-19), data (training identities, face cache), train (the two stages),
generator (shipped generators, person masks), person (the person-mask methods). The comparison of methods on the OPOM
protocol at one L2 norm is faceveil.evaluate.protocols.advcloak."""
