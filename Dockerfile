# Image for docker-compose.yml's migrate, web, worker and beat services (CPU; torch from PyPI).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY moderation ./moderation
COPY workers ./workers
COPY admin ./admin
COPY policies ./policies
RUN pip install --no-cache-dir . \
    && useradd --system --home /var/lib/moderation moderation \
    && mkdir -p /var/lib/moderation && chown moderation /var/lib/moderation
USER moderation
EXPOSE 8000
CMD ["moderation", "serve", "--host", "0.0.0.0", "--port", "8000"]
