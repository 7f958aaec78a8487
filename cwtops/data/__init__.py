"""Signals (sample data, UCR import, shards), the wavelet weight file, project set-up."""
