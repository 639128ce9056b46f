"""Tools around the job: evaluation, training, sample data, packing an environment for a cluster."""
