"""A tiny StudioML-style experiment: prints progress, writes a model file, reports JSON metrics."""

import json
import os
import sys
import time

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
model_dir = os.path.join(
    os.environ.get("STUDIOML_HOME", "."),
    "experiments",
    os.environ.get("STUDIOML_EXPERIMENT", "local"),
    "modeldir",
)
os.makedirs(model_dir, exist_ok=True)
loss = 1.0
for epoch in range(epochs):
    loss *= 0.7
    print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f}")
    print(json.dumps({"experiment": {"epoch": epoch + 1, "loss": round(loss, 4)}}))
    time.sleep(0.05)
with open(os.path.join(model_dir, "model.txt"), "w") as model:
    model.write(f"final loss {loss:.4f}\nargs {sys.argv[1:]}\n")
print("done; args:", sys.argv[1:])
