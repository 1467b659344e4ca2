"""A federated site: private data, local CMA-ES, input perturbation; talks HTTP to both services."""
