# Minimal image: the demo model baked in; mount your own models over /srv/sibyl/models (or set MODEL_PATH).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BIND=0.0.0.0:8000 SIBYL_ENV=production
WORKDIR /srv/sibyl
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN python models/train_demo.py && useradd --system sibyl && chown -R sibyl /srv/sibyl/models
USER sibyl
EXPOSE 8000
# Users (SIBYL_USERS or SIBYL_USERS_FILE) and REDIS_URL come from the orchestrator's secrets.
# serve.py checks WEB_CONCURRENCY (which gunicorn reads before its config file), then execs gunicorn.
CMD ["python", "serve.py"]
