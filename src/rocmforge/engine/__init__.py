"""The serving engine: requests, KV block manager, scheduler, model runner, sampler, detokenizer."""
