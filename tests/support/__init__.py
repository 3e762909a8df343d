"""What the tests use but are not tests: launching runs (``launch``), the repository's paths
(``repo``), the scripts the tests start under the real launcher (``*_runner.py``), the
plain-PyTorch reference implementations (``reference``, ``reference_safelora``), the local
SLURM cluster (``slurm_cluster``) and the collective checker. pytest collects none of them
(no ``test_`` prefix); ``tests/conftest.py`` keeps the fixtures and the pytest hooks."""
