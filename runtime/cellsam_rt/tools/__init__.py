"""Tools around the pipeline: benchmarking, INT8 quantisation, accuracy evaluation, the classical
baseline and a description of the machine's inference software."""
