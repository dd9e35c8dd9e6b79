"""The whole archive driven by third-party clients and harnesses: DCMTK, dicomweb-client,
OHIF, Orthanc, crashes, many senders, planted PHI, the README's commands."""
