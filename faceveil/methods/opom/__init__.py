"""OPOM (Zhong & Deng, TPAMI 2022): person-specific universal privacy masks, and the paper's comparison methods.

One canonical-space mask Delta is shared by all n_k images X_i of one person and maximises, summed over the images,
the distance of the masked image's features f(X_i + Delta) from the person's feature subspace, modelled from the
clean features F = [f(X_1), ..., f(X_nk)] of the same images:

    opom-convex  Eq. 12-13  distance to the convex hull of F (alpha >= 0, sum 1; warm-started active-set solver)
    opom-affine  Eq. 2-8    distance to the affine hull of F (closed form, SVD basis)
    opom-center  Eq. 10-11  distance to the class centre mean(F)
    fi-uap       Eq. 17     ||f(X_i) - f(X_i + Delta)||: each image against its own clean feature
    fi-uap-plus  Eq. 18     sum_j ||f(X_j) - f(X_i + Delta)||: against every clean feature of the person (here the
                            mean over j, so its scale matches the others: the sign step does not see the factor)
    fi-uap-all   §3.3.2     FI-UAP over the training images of ALL identities: one universal mask for everybody
                            (pass the other identities' faces as options.universal_faces; without them it is
                            FI-UAP on the given faces)
    gd-uap       Eq. 16     data-prior GD-UAP: maximise sum_i sum_j log ||l_j(X_i + Delta)|| over the surrogates'
                            activation layers (after each non-linearity / residual block), no identity loss
    gap          §3.3.3     GAP: a small ResNet generator maps a fixed noise to the mask, trained with the FI-UAP
                            loss (Eq. 17) on the person's images (faceveil/methods/gap.py)

Distances are those of the paper: Euclidean between L2-normalised features (normalised features, §3.1); for dlib,
whose embeddings are not centred, the raw L2 distance divided by its 0.6 decision distance (core.L2_SCALE), so the
per-model terms are on one scale and are averaged with the ensemble's weights.

Optimisation is the attack core's loop with a shared perturbation (run_attack's `owner`): Delta_0 ~ U(-eps, eps),
signed steps, projection C_eps (Algorithms 1-2), optionally with momentum (Eq. 14: AttackConfig.momentum) and DFANet
feature dropout (Eq. 15: AttackConfig.dropout). Paper defaults (§4.2.1): L-inf eps 8 (of 255), 16 iterations; the
algorithms step by sign(g) on the 0..255 scale, i.e. alpha = 1/255.

Diverse masks (§4.3.4, Eq. 19): n_M masks learned together, each shared by all the images; besides each masked
image's distance from the subspace, masked copies of the same image under two different masks are pushed apart:

    J = sum_{m,i} [ D(f(X_i + Delta_m), H) + lambda * mean_{m' != m} ||f(X_i + Delta_m) - f(X_i + Delta_m')|| ]

Eq. 19 states the three distances as constraints against the same threshold t, weighing them equally: lambda = 1.

loss.py holds the objectives (the subspace distances, the diversity term, GD-UAP's activations), learners.py the
learners the registry builds (faceveil.methods.registry), gap.py GAP's generator.
"""

