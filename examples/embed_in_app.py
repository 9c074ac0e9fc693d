"""Embed portable_infer in an application: load once, answer many requests.

    python examples/embed_in_app.py [PACKAGE_DIR]
"""

import sys

import portable_infer


def main() -> None:
    model = portable_infer.load(sys.argv[1] if len(sys.argv) > 1 else None)  # None: the default model
    print(f"loaded {model!r}", file=sys.stderr)
    for question in ("What is the capital of France?", "Give me one word that rhymes with cat."):
        answer = model.chat([{"role": "user", "content": question}], max_new_tokens=48)
        print(f"Q: {question}\nA: {answer}\n")


if __name__ == "__main__":
    main()
