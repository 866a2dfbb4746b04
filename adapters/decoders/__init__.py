"""SMP-style decoders: decoders/<name>/{decoder,model}.py."""
