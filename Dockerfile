# wadi on the official PyTorch CUDA runtime image.
#   docker build -t wadi .
#   docker run --gpus all -v $HOME/.cache/huggingface:/root/.cache/huggingface -v $PWD:/work wadi \
#       sample "a shiba inu wearing a beret" --backbone sd21 --out /work/samples
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/wadi
COPY pyproject.toml README.md ./
COPY wadi_cli ./wadi_cli
# torch comes from the base image (pyproject asks for torch>=2.4 and Python>=3.11; the image has both).
# baselines = peft (LoRA/DoRA students), tensorboard = training logs, 8bit = bitsandbytes AdamW8bit
RUN pip install ".[baselines,tensorboard,8bit]" && wadi --version

WORKDIR /work
ENTRYPOINT ["wadi"]
CMD ["--help"]
