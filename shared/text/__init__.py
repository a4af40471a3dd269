"""Media and item text turned into words and signals on the device: speech transcripts and subtitles
(`transcribe`), keywords and sentiment (`analysis`)."""
