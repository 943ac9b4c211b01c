"""Memory and speed tools: fp8 weights, block swap, activation offload, split attention."""
