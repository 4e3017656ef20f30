"""zmesh: a decentralized, prefix-cache-aware LLM serving mesh."""
