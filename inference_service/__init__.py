"""The inference service: owns the model and exposes only soft-prompt scoring over HTTP."""
