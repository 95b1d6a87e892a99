# Redis for the job queue (AOF on, see compose.yml). BASE: the public image, or any image with redis-server on PATH
# (the test harness uses Debian's redis-server when the public image cannot be pulled).
ARG BASE=redis:7.2
FROM ${BASE}
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--appendonly", "yes"]
