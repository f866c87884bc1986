"""The service behind the RPCs: the model registry and facade, the worker pool, the jobs."""
