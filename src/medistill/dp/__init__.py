"""Differential privacy in one place: the (ε, δ) accounting (`accounting`), the Gaussian mechanism the private
methods share (`mechanism`), the secret randomness every private draw comes from (`randomness`) and the DP-SGD
classifier baseline (`dpsgd`). The private methods themselves stay one file each in `methods/` (dp_dm, dp_dc)
and import from here; the empirical checks (near-copy screen, membership inference, the canary audit) are in
`audit/`."""
