"""The classifier: the task adapter (encode, embed, logits over scoped parameters), fine-tuning
and retraining, and preparing a bundle from a base model."""
