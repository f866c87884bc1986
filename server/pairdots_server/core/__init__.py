"""pairdots_server.core: the influence math in pure torch (no I/O, no other project imports).

Modules (import them directly; nothing is imported here):
  aliases     LogitsFn / ShouldStop type aliases
  params      flatten / unflatten / num_params (flat θ vectors)
  saliency    Target, TokenScore, target_value, token_saliency, word_scores,
              grad_theta_word_score (Eq. 1–2, §3.1; ∇θ w by double backprop)
  grads       per_example_loss_grads (vmap) / per_example_loss_grads_loop (reference)
  batches     Batch, BatchProvider, TensorBatches (curvature data)
  curvature   Curvature (GGN | HESSIAN), CurvatureOperator.matvec, estimate_lambda_max
  ihvp/       (H + δI)⁻¹ v: base (SolveDiagnostics, SolveResult, InverseHVPSolver), exact, cg,
              lissa (App. B), lowrank (Lanczos factors + projection solve)
  influence   Eq. 5 influence_on_score, Eq. 6–7 perturbed_influence,
              Eq. 8 token_influence_exact / token_influence_fast
  exceptions  SolverError(ValueError), SolverDiverged(SolverError)
"""
