# shardgen: a CUDA image whose entry point is the launcher.
#   docker build -t shardgen .
#   docker run --gpus all --shm-size 1g -p 3000:3000 -v $HOME/models:/models \
#       shardgen --model-id /models/Meta-Llama-3.1-8B-Instruct --num-shard 1
# The base image brings CUDA, a CUDA build of torch and its matching triton.

ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY router router
COPY shard shard
COPY launcher launcher
COPY common common
# The wheel build generates the gRPC stubs from proto/generate.proto.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/data \
    PORT=3000
COPY --from=build /wheels /wheels
# torch is already in the base image and satisfies the package's torch>=2.4.
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels
VOLUME /data
EXPOSE 3000
ENTRYPOINT ["shardgen-launcher", "--hostname", "0.0.0.0", "--port", "3000"]
