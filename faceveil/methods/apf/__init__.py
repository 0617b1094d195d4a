"""APF (Zhang et al., ACM MM 2020): the end-cloud adversarial privacy-preserving filter. The client computes an
image-specific gradient g with a small probe model (probe); the server turns it into the noise
s = clip_eps(T(g) + E(u)) with a gradient-transfer U-Net T, a universal perturbation u and its enhancement E
(networks), trained by train; server and client speak the wire format (wire)."""
