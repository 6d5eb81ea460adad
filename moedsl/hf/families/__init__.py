"""The model families: one module each, registered by ``model_type`` (see ``moedsl.hf``)."""
