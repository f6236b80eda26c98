"""Running a loaded model: `fold` (an adapter folded into plain weights, for decoding and for
`lav2 merge`) and `generate` (batched decoding with a static KV cache)."""
