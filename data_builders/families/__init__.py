"""Independent synthetic paired-data generator families (each module: ``generate(out_dir, ...)``)."""
