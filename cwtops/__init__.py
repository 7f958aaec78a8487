"""cwtops: a hybrid CWT-CNN classifier for 1-D signals and the MLOps around it.

The package holds everything the pipeline's stages (tasks/) and flows (flows/) use, by concern:

- core: params and their derived values, artifact paths, atomic writes, S3 locations, errors
- data: signals (sample data, UCR import, shards), the wavelet weight file, project set-up
- model: the network (frozen wavelet front-end + trainable head), data-parallel training, the ONNX signature
- registry: the MLflow tracking server, registered versions and their lineage, promotion policy
- serving: the Triton server, its client, publishing, the rollout reconciler, the webhook receiver
- services: process supervision, the Debian packages tests need
- variants: optimized ONNX variants (fp16, int8) and their accuracy check
- cli: the commands that need no stage or flow

It never imports tasks/, flows/, bench/ or tests/ (import contracts in pyproject.toml).
"""
