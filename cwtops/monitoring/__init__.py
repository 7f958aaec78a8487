"""The production loop: the inference log read back, shadow scoring of the challenger, drift, feedback."""
