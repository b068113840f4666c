"""The lab: measuring and improving retrieval quality — ``lookalike evaluate`` and ``lookalike finetune``.

Nothing here is needed to get images in or to search them; nothing outside the lab imports it (the
``lookalike.commands`` entry point ``lab = "ingest.lab.cli:register"`` and the tests/benchmarks aside). The lab
may use ``search.*``, ``ingest.sources``, ``ingest.tagging`` and ``ingest.pipeline``, never ``workers``.

Modules, each importing only those above it (no circles)::

    metrics         pure numpy: nearest neighbours, precision@k, kNN votes, AP@k, retrieve(), PCA
    embedcache      the per-model embedding cache and embed_refs (composite models from their parts' caches)
    datasets        ImageFolder trees → embedded Dataset; the stable stratified split   ← embedcache
    ann             exact vs HNSW (and quantized) search through a temporary store      ← metrics
    nearduplicates  altered copies: is the original found at rank 1?                    ← metrics, embedcache, datasets
    evaluation      evaluate_model: every figure of `evaluate` for one model            ← all of the above
    reports         text table, JSON cleaning, report.md and plots                      ← metrics, nearduplicates
    finetune        PCA / projection head on frozen embeddings, saved as a named model ← metrics, embedcache, datasets
    cli             register(group): the evaluate and finetune commands                ← evaluation, reports, finetune

``reports`` names ``evaluation.ModelRun`` for type checking only. This package imports none of its modules,
so ``lookalike --help`` loads nothing but ``cli``.
"""
