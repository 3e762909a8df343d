"""Process groups, collectives and DeepSpeed ZeRO-3: everything that knows about ranks and shards."""
