namespace Optpoline.Configuration;

/// <summary>A config file is invalid; the message reads <c>PATH:LINE:COLUMN: what is wrong</c>.</summary>
public sealed class ConfigException : Exception
{
    /// <summary>Creates the exception.</summary>
    public ConfigException()
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public ConfigException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception with a message and a cause.</summary>
    public ConfigException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    /// <summary>Creates the exception for a place in a file.</summary>
    public ConfigException(string path, int line, int column, string problem, Exception? innerException = null)
        : base($"{path}:{line}:{column}: {problem}", innerException)
    {
        Path = path;
        Line = line;
        Column = column;
        Problem = problem;
    }

    /// <summary>The file (or the name given for text).</summary>
    public string? Path { get; }

    /// <summary>1-based line of the problem (0: the file as a whole).</summary>
    public int Line { get; }

    /// <summary>1-based column of the problem (0: the file as a whole).</summary>
    public int Column { get; }

    /// <summary>What is wrong, without the place.</summary>
    public string? Problem { get; }
}
