"""Influence of training examples on a test word's saliency: the served model's runtime, the
solver policy and the pipeline steps that Explain, Attack, Repair and the benches compose."""
