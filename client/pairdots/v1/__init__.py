"""pairdots.v1: generated messages and stubs (protos/pairdots/v1)."""
