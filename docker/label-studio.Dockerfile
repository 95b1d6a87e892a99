# Label Studio for `--profile demo`. The public image is used as it is; the test harness builds an equivalent
# stand-in (Label Studio 1.23.2 from PyPI) when it cannot be pulled.
ARG BASE=heartexlabs/label-studio:1.23.2
FROM ${BASE}
EXPOSE 8080
