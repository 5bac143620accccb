# Two entry points on a fresh machine:
#   make train   install, build the embedded sample set, train Swift-SRGAN on it
#   make test    install (with test tools and the Beam extra) and run the test suite
#   make zoo     train, export and evaluate every shipped model into saved_models/
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt requirements-beam.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	touch $(STAMP)

.PHONY: install test train samples zoo
install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

samples: $(STAMP)
	$(BIN)/python -m data_prep --samples --output=tfrecords/samples

train: $(STAMP)
	$(BIN)/python train.py --model=swift_srgan

zoo: $(STAMP)
	$(BIN)/python zoo.py --build=all
