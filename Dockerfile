# A container with the tested pins, for clusters that run jobs in Apptainer/Singularity or Docker.
#   docker build -t diffcredit .
#   apptainer build diffcredit.sif docker-daemon://diffcredit:latest
#   apptainer exec --nv diffcredit.sif snakemake --profile slurm ...   (see docs/cluster.md, "Containers")
FROM python:3.11-slim
WORKDIR /opt/diffcredit
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .
ENV ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
CMD ["snakemake", "--cores", "2"]
