FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY outreach ./outreach
COPY workers ./workers
RUN pip install --no-cache-dir .
COPY campaigns ./campaigns
COPY templates ./templates
ENV NO_PROXY=127.0.0.1,localhost
EXPOSE 8000
CMD ["outreach", "serve", "--host", "0.0.0.0", "--port", "8000"]
