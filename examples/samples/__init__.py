"""The servers behind the samples `scripts/run` starts (and the tests start too): a
Kubernetes API server that answers as the real one does (kubeapi), a certificate
authority (pki), a real PostgreSQL (postgres) and a real OpenSSH server (sshd).

They live here, not under tests/, because `scripts/run` runs them on a fresh clone with
only what it installs itself (the `run` extra)."""
