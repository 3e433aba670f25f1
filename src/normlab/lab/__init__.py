"""The lab: claims people cite about normalization, each run as an experiment on real or generated data on a
CPU.

- :mod:`normlab.lab.data` — offline data sets (digits, mnist1d, mnist-subset, mnist, padded-seq)
- :mod:`normlab.lab.models` — MLP, CNN (1d/2d), GRU/LSTM with norms in the cell, tiny transformer
- :mod:`normlab.lab.training` — the shared training loop
- :mod:`normlab.lab.experiments` — one module per claim, and the registry (how to add one)
- :mod:`normlab.lab.verdict` — reproduced / not reproduced / inconclusive, by rules over seeds
- :mod:`normlab.lab.runner` — cached, atomic runs in worker processes
- :mod:`normlab.lab.report` — ``index.html`` and ``results.json`` from the runs on disk
- :mod:`normlab.lab.cli` — ``normlab lab list | run | report``
"""
