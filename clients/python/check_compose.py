"""Static check of compose.yaml (no Docker engine here): it parses, every Keel
service runs a binary the Dockerfile ships, has a grpc health check through
that binary (the console's asks its HTTP /healthz), and gets the configuration its binary requires."""

import re
import sys

import yaml

REQUIRED = {
    "keel-auth": ["DATABASE_URL", "KEEL_JWT_PRIVATE_KEY_FILE"],
    "keel-jobs": ["DATABASE_URL", "REDIS_URL", "KEEL_WORKER_TOKEN", "KEEL_JWT_PUBLIC_KEY_FILES"],
    "keel-memory": ["DATABASE_URL", "KEEL_JWT_PUBLIC_KEY_FILES"],
    "keel-worker": ["REDIS_URL", "KEEL_WORKER_TOKEN", "KEEL_JOBS_URL"],
    "keel-console": ["KEEL_CONSOLE_ADDR", "KEEL_AUTH_URL", "KEEL_JOBS_URL", "KEEL_MEMORY_URL"],
}


def main(compose_path, dockerfile_path):
    compose = yaml.safe_load(open(compose_path))
    shipped = set(re.findall(r"target/release/(keel-[a-z]+)", open(dockerfile_path).read()))
    services = compose["services"]
    seen = set()
    for name, svc in services.items():
        command = svc.get("command") or []
        if not command or not command[0].startswith("keel-"):
            continue
        binary = command[0]
        seen.add(binary)
        assert binary in shipped, f"{name}: {binary} is not built by the Dockerfile"
        test = svc.get("healthcheck", {}).get("test", [])
        assert test[:3] == ["CMD", binary, "healthcheck"], f"{name}: health check {test}"
        env = svc.get("environment", {})
        for var in REQUIRED[binary]:
            assert var in env, f"{name}: {var} missing"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name}: depends on unknown {dep}"
    assert seen == set(REQUIRED), f"compose runs {sorted(seen)}"
    print(f"compose check: {len(seen)} Keel services valid")


if __name__ == "__main__":
    main(*sys.argv[1:3])
