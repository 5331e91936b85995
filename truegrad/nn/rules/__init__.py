"""Layer families: one file each, holding the autograd Functions that compute gradients
and per-sample squared sums (``base`` holds what they share, ``registry`` the lookup)."""
