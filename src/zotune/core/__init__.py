"""The zeroth-order core: counter-based directions, kernels, perturbation, estimators,
updates, trajectories and the MeZO optimizer. Needs only torch and numpy (numba and
triton speed it up where installed)."""
