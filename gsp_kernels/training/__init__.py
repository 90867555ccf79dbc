"""Metric learning with GSP, one module a job:

- ``config``: the settings of a run (``TrainConfig``), their choices and checks, ``RunError``.
- ``config_files``: settings read from YAML or TOML files, and the run's own written into its folder.
- ``recipes``: the authors' settings per benchmark.
- ``datasets``: the benchmarks (``load_benchmark``, ``BenchmarkData``, folds, subsets);
  ``datasets.readers`` their archives, ``datasets.images`` image lists and ImageFolder trees,
  ``datasets.collage`` the embedded data.
- ``transforms``: the papers' torchvision transforms.
- ``samplers``: class-balanced batches, and a seed per sample.
- ``distributed``: torchrun's process group, the device, what the ranks exchange.
- ``checkpoint``: seeds and RNG states, the checkpoint file (loaded without running code from
  it) and resuming from it, the output folder checked before any data is read.
- ``files``: files written whole or not at all, and the check that a folder can be written.
- ``models``: the embedding models (a trunk and a GAP or GSP head).
- ``loop``: one model's training loop (``fit``).
- ``embeddings``: embeddings of trained models and their retrieval scores.
- ``metrics``: retrieval metrics (Recall@K, MAP@R, R-Precision).
- ``protocols``: the standard protocol and the MLRC protocol (one model per fold).
- ``run``: ``train(config)``: setup, data, and the protocol.
- ``report``: every table a run prints, and the record of results.json.
- ``provenance``: where a result came from (versions, git commit, device, command line).
- ``tensorboard_log``: ``--log tensorboard``'s event files; ``figures`` the weight-map figure.
- ``evaluate``: saved models evaluated without training.
- ``demo``: GAP vs GSP on the embedded data.
- ``cli``: ``gsp-kernels train``, ``evaluate`` and ``demo``.
"""
