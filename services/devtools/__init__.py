"""Developer tooling: a tiny random model and real PEFT test adapters, built once and cached."""
