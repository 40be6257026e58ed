"""What leaves the factory: the report and card of a release, numbered versions
(git tag + DVC remote, :mod:`~defectforge.publish.versions`) and the consumer side
(:mod:`~defectforge.publish.consume`: ``defectforge.load`` and ``ManifestDataset``)."""
