"""Inverse curvature-vector products x = (H + δI)⁻¹ v: exact, CG, LiSSA (App. B), low-rank."""
