"""Stage folders and manifests, atomic writes, shards, downloads, archives, MLflow helpers."""
