# The service image: one process per container. The default command migrates
# and serves (the single-container form); the scaled-out form runs the same
# image as servers, `runworker` workers and a one-shot migration
# (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite:////app/data/db.sqlite3

WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# The code stays owned by root and read-only to the service; only the data
# directory (the embedded SQLite file) is its own.
COPY . .
RUN useradd --no-log-init --create-home --uid 10001 app \
    && mkdir -p /app/data \
    && chown 10001 /app/data
USER 10001

EXPOSE 8000

# Liveness only: /readyz also needs the database and Redis, and a container
# must not be restarted because they are down.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'], timeout=2)"]

CMD ["sh", "-c", "python manage.py migrate --noinput && exec python manage.py serve"]
